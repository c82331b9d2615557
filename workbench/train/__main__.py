import sys

from workbench.train import main

sys.exit(main())
