"""The quantization pipeline, one module or package per stage in the order a user runs them:
`models` (resolve a model), `sensitivity` (sensitivity files, fingerprints, the analysis cache),
`analyze`, `allocate`, `finetune`, `export`; `quantize` is the one orchestrator that calls several.
`plots` draws analyses and allocations. A stage never imports a later stage or the orchestrator."""
