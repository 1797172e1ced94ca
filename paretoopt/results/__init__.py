"""A study's results, read without torch: the typed trial record (``record``), latency
pooled per deployed structure (``pooling``), the trials and front as frames
(``frames``), picks (``pick``), the explorer's data (``explore``) and the terminal
report (``report``)."""
