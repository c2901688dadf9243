"""How teacher outputs are produced beyond a plain frozen forward pass.

- `kd_lightning.teachers.moe`: router discovery for Mixture-of-Experts teachers and Knowledge
  Augmentation (stochastic expert routing, "Every Expert Matters").
- `kd_lightning.teachers.teacher_outputs`: a frozen teacher's outputs stored once and read by later
  runs (`teacher_outputs.reuse`).
- `kd_lightning.teachers.teacher_cache`: offline sparse targets (`stage=cache_teacher`,
  `teacher=cached`).

Building a teacher from its config (pre-training, the `augment:` node) is `kd_lightning.stages`.
"""

