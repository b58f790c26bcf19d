"""benchmarks.kernel_sass's loop finder on a SASS listing (no Triton needed)."""

from __future__ import annotations

from benchmarks.kernel_sass import loops

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                  /* 0x00000a0000017a02 */
        /*0010*/                   LDS.U8 R2, [R3] ;                       /* 0x0000000003027984 */
        /*0020*/              @!P0 HMMA.16816.F32 R4, R8, R12, R4 ;        /* 0x0000000c0804723c */
        /*0030*/                   IMAD.MOV.U32 R5, RZ, RZ, R6 ;           /* 0x000000ffff057224 */
        /*0040*/               @P1 BRA 0x10 ;                              /* 0x0000000000008947 */
        /*0050*/                   FMUL R7, R7, R8 ;                       /* 0x0000000807077220 */
        /*0060*/                   BRA 0x50 ;                              /* 0xfffffff000007947 */
        /*0070*/                   BRA 0x80 ;                              /* 0xfffffff000007947 */
        /*0080*/                   EXIT ;                                  /* 0x000000000000794d */
"""


def test_each_backward_branch_is_a_loop_with_its_opcodes():
    found = loops(SASS)
    assert [(loop.start, loop.instructions) for loop in found] == [(0x10, 4), (0x50, 2)]
    assert found[0].opcodes == {"LDS.U8": 1, "HMMA.16816.F32": 1, "IMAD.MOV.U32": 1, "BRA": 1}
    assert found[1].opcodes == {"FMUL": 1, "BRA": 1}
