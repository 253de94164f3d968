import os
import sys

# tests import the top-level modules (taxonomy, unet, model, train, sample) directly
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
