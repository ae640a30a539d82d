;; Never returns: only a stop or a time limit ends it.
(module
  (func (export "spin")
    (loop $forever (br $forever))))
