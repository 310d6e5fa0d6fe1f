"""The model and what it is made of: config, the table of hook sites (names), hooks,
layer kernels, the model (its forward pass, its weight views, its hooked runs), inputs
(tokenized and checked once), the cache and the readings of the stream it allows
(decompose, lens), tokenizer, factored matrices, heads, neurons, the residual stream,
the one result type, and the protocols the parts need of a model or a cache. Imports
nothing from the layers above it."""
