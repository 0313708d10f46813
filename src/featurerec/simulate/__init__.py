"""The CloudFlow simulator: a seeded SaaS product to develop and test featurerec against.

* :mod:`.world` — ``generate_world(WorldConfig) -> World``, ``World.write(dir)``: population,
  hidden utility, daily behaviour, and the world directory (events, product tables,
  ``manifest.json``, ``ground_truth/``). The generative model is described there.
* :mod:`.calibration` — the world's product figures next to the spec's
  (``featurerec simulate calibrate DIR``).
* :mod:`.truth` — ``GroundTruth.load(dir)``: utility, eligibility, adoption state; only
  evaluation (oracle) and the simulator itself may read it.
* :mod:`.response` — ``ResponseModel``: click / dismiss / 7-day adoption of shown
  recommendations per placement.
* :mod:`.state` — ``WorldState.load(dir).advance(days, exposures)``: continue the world with
  recommendations shown (used by :mod:`.online` for simulated experiments).
* :mod:`.params` — every numeric knob, the fitted ones marked; :mod:`.tuning` refits them.

Command line: ``featurerec simulate --users N --days D --seed S --out DIR
[--format parquet|ndjson] [--features N] [--activity X]``.
"""
