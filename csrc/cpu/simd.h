// Function multi-versioning for the CPU kernels' hot loops: on x86-64 with GCC
// each marked function is compiled for AVX-512, AVX2 and the baseline, and the
// loader picks the best one the running CPU supports (ifunc).  The build uses
// -ffp-contract=off, so the wider clones round every operation exactly like
// the baseline: results are bit-identical whichever clone runs.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(CODEQ_NO_CLONES)
#define CODEQ_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CODEQ_CPU_CLONES
#endif
