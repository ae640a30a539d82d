;; WASI-free exports with typed parameters and results: what a task's inputs are converted to.
(module
  (func (export "add") (param $a i32) (param $b i32) (result i32)
    (i32.add (local.get $a) (local.get $b)))
  ;; several results of mixed types: the results string joins them with commas
  (func (export "mix") (param $x f64) (param $n i64) (result f64 i64 f32)
    (f64.div (local.get $x) (f64.const 4))
    (i64.mul (local.get $n) (i64.const -3))
    (f32.const 0.1)))
