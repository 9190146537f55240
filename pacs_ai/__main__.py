from pacs_ai.cli import main

raise SystemExit(main())
