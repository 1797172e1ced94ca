"""A study: plans drawn from the space (``sampling``, ``anchors``), one trial run end to
end (``trial``), the loop that claims and runs trials (``loop``), the study folder and
its storage (``session``, ``sharing``), and the start-up shared by a search and its
workers (``startup``, ``search``, ``workers``)."""
