from .workflow.cli import main

raise SystemExit(main())
