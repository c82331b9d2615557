"""The conversation data model (`Turn`, `Span`, `Conversation`) and the record → tokens alignment
(`align`: chat template, input_ids, labels, semantic_ids for any tokenizer).

It sits below both the model code and the workbench: the store, the UI, training, chat and the model
code (generation, the zoo's builds) all import it from here, and nothing here imports `workbench`."""
