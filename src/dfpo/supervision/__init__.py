"""What the learner is told: noise models over a task's rewards (:mod:`~dfpo.supervision.noise`: clean, flips,
Gaussian, pseudo-labels from the starting policy's majority vote) and the learned reward model of the dialogue
task (:mod:`~dfpo.supervision.reward_model`). A layer above tasks and generation: it scores completions with a
task's verifier, or samples the starting policy, and never imports the trainer."""
