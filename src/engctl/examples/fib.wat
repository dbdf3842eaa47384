;; fib(n): the n-th Fibonacci number, iteratively, in i64 (fib(0) = 0, fib(1) = 1).
;; Loaded by engctl.examples.wasm_fib, which compiles this text at start-up.
;; fib(92) is the largest that fits in an i64; the worker rejects n outside 0..92
;; (i64 addition wraps silently in WebAssembly, it does not trap).
(module
  (func $fib (export "fib") (param $n i64) (result i64)
    (local $a i64)
    (local $b i64)
    (local $next i64)
    (local.set $b (i64.const 1))
    (block $done
      (loop $step
        (br_if $done (i64.le_s (local.get $n) (i64.const 0)))
        (local.set $next (i64.add (local.get $a) (local.get $b)))
        (local.set $a (local.get $b))
        (local.set $b (local.get $next))
        (local.set $n (i64.sub (local.get $n) (i64.const 1)))
        (br $step)))
    (local.get $a)))
