from unet.cli import main

raise SystemExit(main())
