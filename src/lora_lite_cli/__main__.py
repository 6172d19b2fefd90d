from lora_lite_cli import main

raise SystemExit(main())
