import sys

from rlhf.labeling.cli import main

sys.exit(main())
