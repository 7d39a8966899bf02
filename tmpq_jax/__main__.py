import sys

from tmpq_jax.cli import main

sys.exit(main())
