from gpt3zh.cli import main

raise SystemExit(main())
