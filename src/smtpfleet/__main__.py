from smtpfleet.cli import main

raise SystemExit(main())
