"""The shared machinery every method runs on: model, sampler, likelihoods, rollout record, RL loop, run I/O."""
