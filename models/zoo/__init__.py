"""The embedded default models: the synthetic shapes task (`shapes`), the default VLM's tokenizer
and processor (`processor`), its config and training (`build`), evaluation (`evaluate`) and the
HSA experiment (`experiment`). `python -m models.zoo --help` lists the commands."""
