;; Grows linear memory one page at a time until the host refuses, then traps, as an allocator
;; that cannot handle out-of-memory would. `grow_forever` ignores the refusal and keeps asking.
(module
  (memory (export "memory") 1)
  (func (export "bomb") (result i32)
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable)
  (func (export "grow_forever")
    (loop $more
      (drop (memory.grow (i32.const 16)))
      br $more)))
