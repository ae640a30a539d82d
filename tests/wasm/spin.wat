;; CPU burners: `spin` and `_start` never return; `count` runs n iterations (for fuel budgets).
(module
  (func $spin (export "spin")
    (loop $forever br $forever))
  (func (export "_start")
    call $spin)
  (func (export "count") (param $n i64) (result i64)
    (local $i i64)
    (block $done
      (loop $again
        local.get $i local.get $n i64.ge_u br_if $done
        local.get $i i64.const 1 i64.add local.set $i
        br $again))
    local.get $i))
