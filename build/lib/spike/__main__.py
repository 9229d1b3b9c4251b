from spike.app.cli import main

raise SystemExit(main())
