"""Training the embedded micro model (micro). Apart from the evaluation path: it imports nothing
from harness.run, and the runner reaches it only to build the model a recipe names."""
