"""What a study is asked to do: the space file (``space``), its knobs, the plan one
trial applies (``plan``) and the objectives it can be judged on (``metrics``). Names and
numbers only: no torch, no ONNX, nothing that runs a model."""
