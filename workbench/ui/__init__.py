"""The workbench's tabs: one module per tab, each thin over functions tested without a browser."""
