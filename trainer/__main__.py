"""`python -m trainer ...`: the engine's command line."""

import signal
import sys

from .cli import main

try:
    code = main()
except KeyboardInterrupt:  # Ctrl+C after the command's own handling
    code = 130
finally:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is over: a late Ctrl+C must not kill the exit
sys.exit(code)
