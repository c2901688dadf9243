"""How teacher outputs are produced beyond a plain frozen forward pass.

- `kd_lightning.teachers.moe`: router discovery for Mixture-of-Experts teachers and Knowledge
  Augmentation (stochastic expert routing, "Every Expert Matters").
- `kd_lightning.teachers.store` (+ `encodings`): the one content-addressed store of a frozen
  teacher's next-token distributions (full, top-k + tail, Random-Sampling KD counts), filled by
- `kd_lightning.teachers.teacher_outputs`: online, outputs stored as a sweep's first run computes
  them and read by later runs (`teacher_outputs.reuse`);
- `kd_lightning.teachers.teacher_cache`: offline, the whole training split (`stage=cache_teacher`,
  `teacher=cached`).

Building a teacher from its config (pre-training, the `augment:` node) is `kd_lightning.run.builders`.
"""

