import sys

from workbench.evaluate import main

sys.exit(main())
