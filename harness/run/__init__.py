"""The run: the Hydra config made into objects (job), the method and its retention (method,
calibrate), checks before anything loads (validate), the run directory (rundir) and identity, the
request loop lmms_eval drives (requests), data parallelism (distributed), and `evaluate.run`."""
