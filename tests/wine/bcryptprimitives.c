/* Test-only stand-in for Windows' bcryptprimitives.dll, for running cla-worker.exe under Debian 12's
 * Wine 8, which lacks it. Rust's standard library (1.78+) gets its random bytes from
 * bcryptprimitives!ProcessPrng; this shim answers that call with advapi32!SystemFunction036
 * (RtlGenRandom), which Wine has. It is built by packaging/smoke-windows.sh next to the .exe in a
 * temporary directory and is never part of a release: real Windows (10 and later) has the DLL. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len > 0) {
        ULONG n = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, n)) {
            return FALSE;
        }
        data += n;
        len -= n;
    }
    return TRUE;
}
