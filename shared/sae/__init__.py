"""Sparse autoencoders as artifacts: one architecture per module behind one interface.

`base.SparseAutoencoder` is the interface (encode, decode, loss terms, tensors); `relu`,
`jumprelu` and `topk` are the architectures, `models` builds one from a config or from
stored tensors, and `artifacts` saves and loads a trained SAE in the store. They live in
`shared/` because two services use them: the SAE stage trains and applies them, and the
evaluator's feature explorer applies them, and a service never imports another service.
"""
