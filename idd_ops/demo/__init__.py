"""End-to-end demonstration: procedural street scenes, teacher/student segmentation networks, and
the distillation experiment behind the `idd-distill` command."""
