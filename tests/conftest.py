import os
import sys

# The tests import helpers as `tests.support...`; make the project root importable
# whatever directory pytest was started from.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.fixtures import *  # noqa: E402,F401,F403  (fleet_factory, fleet3, qemu_migrate)
