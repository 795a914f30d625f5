from iim.cli import main

raise SystemExit(main())
