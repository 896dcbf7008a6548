/* no_symbol.c — a shared library without the entry symbol (say, a misplaced libfoo.so):
 * the host must refuse it. */
#include "patchbay_connector.h"

PB_EXPORT int patchbay_connector(void) { return 0; } /* close, but not the entry symbol */
