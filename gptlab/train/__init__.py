"""The training stages, side by side: pretrain, sft, reward (rm), dpo and rl, one file each, each with its whole
loop visible. They import only the shared pieces of this floor (loop, optim, metrics, sharding, preferences,
preference_fit, rl_objectives, rl_rollouts) and what lies below (model, checkpoint, tokenizer, data, tasks,
infer, eval), never each other; the speedrun chains them."""
