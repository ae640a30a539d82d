;; CPU-bound benchmark kernel (embedded in firmware/src/core/bench_modules.c).
;; No linear memory, so an instance costs only the runtime's bookkeeping and its stack.
(module
  (func (export "cpu") (param $n i32) (result i32)
    (local $acc i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $acc (i32.add (i32.mul (local.get $acc) (i32.const 31)) (local.get $n)))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $next)))
    (local.get $acc)))
