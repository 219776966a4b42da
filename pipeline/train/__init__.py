"""Lightning training modules: FP backbone training, distillation and reconstruction losses."""
