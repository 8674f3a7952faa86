"""centinela.matcher: encrypted galleries in HNSW, the plate index, and their keys.

Modules, one noun each:

* :mod:`~centinela.matcher.keys` — ``KeyProvider`` protocol and the embedded ``FileKeyProvider``
  (owners' key-encryption keys).
* :mod:`~centinela.matcher.envelope` — AES-256-GCM with associated-data binding.
* :mod:`~centinela.matcher.datakeys` — owners' data keys, wrapped in the database.
* :mod:`~centinela.matcher.store` — ``TemplateStore``: subjects, templates, plates, change log
  (with :mod:`~centinela.matcher.plate_records` and :mod:`~centinela.matcher.key_rotation`).
* :mod:`~centinela.matcher.gallery` — ``FaceGallery`` over hnswlib, ``Hit``.
* :mod:`~centinela.matcher.plates` — plate normalisation, look-alikes, ``PlateIndex``.
* :mod:`~centinela.matcher.snapshot` — encrypted index snapshots.
* :mod:`~centinela.matcher.service` — ``Matcher``, the facade the server uses.
* :mod:`~centinela.matcher.calibration` — the threshold that meets a target FPIR (R8).
* :mod:`~centinela.matcher.synth` — synthetic face embeddings for tests and benchmarks.
"""
