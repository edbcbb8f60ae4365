"""The learner: one model sharded with FSDP2 over N ranks (gloo on CPU, NCCL on GPUs) that recomputes
log-probs, applies the policy updates, saves and restores training state and streams weights to rollout.

* learner/config.py     frozen configs (optimizer, lr schedule, batch split, loss, dtype, packing, checkpointing)
* learner/batching.py   mini-batch → rank → micro-batch plan (token-balanced) and micro-batch tensors, packed or
                        padded (pure)
* learner/model.py      building the FSDP2 model (meta device, rank 0 reads the checkpoint), activation
                        checkpointing, the forward that returns response-token log-probs
* learner/attention.py  block-diagonal causal attention for packed micro-batches (registered with transformers)
* learner/logprobs.py   the chunked LM head: log-probs and entropy without [tokens × vocab] float32 logits
* learner/update.py     one optimizer step over a mini-batch's micro-batches, metrics with one host sync
* learner/worker.py     LearnerWorker, one rank (plain class, no Ray)
* learner/group.py      LearnerGroup, the ranks as Ray actors (the only file that touches Ray)
* learner/distributed.py process-group setup; learner/synthetic.py random batches for tests and benchmarks;
  learner/memory.py     peak memory of a region (benchmark and tests)

Submodules are imported explicitly (`from learner.group import LearnerGroup`): importing this package
imports neither torch.distributed nor Ray.
"""
