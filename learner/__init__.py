"""The learner: one model sharded with FSDP2 over N ranks (gloo on CPU, NCCL on GPUs) that recomputes
log-probs, applies the policy updates, saves and restores training state and streams weights to rollout.

* learner/config.py     frozen configs (optimizer, lr schedule, batch split, loss, dtype)
* learner/batching.py   mini-batch → rank → micro-batch plan and micro-batch model inputs (pure)
* learner/worker.py     LearnerWorker, one rank (plain class, no Ray)
* learner/group.py      LearnerGroup, the ranks as Ray actors (the only file that touches Ray)
* learner/distributed.py process-group setup; learner/synthetic.py random batches for tests and benchmarks

Submodules are imported explicitly (`from learner.group import LearnerGroup`): importing this package
imports neither torch.distributed nor Ray.
"""
