""" What only train.py needs: the command line (timm's flags), data, model and optimizer factories,
run folders and checkpoints, tracking and the exported model. The library (`timm_gmix`) does not
import it. """
