import sys

from longlora_plugin.cli import main

sys.exit(main())
