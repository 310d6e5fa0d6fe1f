"""The model and what it is made of: config, hook names, hooks, layer kernels, the model,
its cache, tokenizer, factored matrices, heads, neurons, the residual stream and the one
result type. Imports nothing from the layers above it."""
