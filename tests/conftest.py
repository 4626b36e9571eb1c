import os
import sys
import warnings

# The rank functions live next to the tests; spawned ranks import them by module name.
sys.path.insert(0, os.path.dirname(__file__))
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|absl).*")
