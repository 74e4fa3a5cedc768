from scaling.core.runner.command_line import main

raise SystemExit(main())
