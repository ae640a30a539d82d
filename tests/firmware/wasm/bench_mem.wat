;; Memory-bound benchmark kernel (embedded in firmware/src/core/bench_modules.c).
;; Writes and reads back every word of its 64 KiB page. memory.grow is reachable, so a runtime
;; cannot shrink the memory below the page the module declares.
(module
  (memory 1)
  (func (export "mem") (param $rounds i32) (result i32)
    (local $addr i32)
    (local $sum i32)
    (if (i32.lt_s (local.get $rounds) (i32.const 0))
      (then (drop (memory.grow (i32.const 1)))))
    (block $done
      (loop $next
        (br_if $done (i32.eqz (local.get $rounds)))
        (local.set $addr (i32.const 0))
        (block $page_done
          (loop $word
            (br_if $page_done (i32.ge_u (local.get $addr) (i32.const 65536)))
            (i32.store (local.get $addr) (i32.add (local.get $addr) (local.get $rounds)))
            (local.set $sum (i32.add (local.get $sum) (i32.load (local.get $addr))))
            (local.set $addr (i32.add (local.get $addr) (i32.const 4)))
            (br $word)))
        (local.set $rounds (i32.sub (local.get $rounds) (i32.const 1)))
        (br $next)))
    (local.get $sum)))
