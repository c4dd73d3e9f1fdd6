/*
 * dirs — creating the directories archmirror keeps its data in (`mkdir -p`).
 *
 * Used at start-up by the stores and by main, before the loop serves; it blocks on the
 * file system and must never be called from a request path.
 */
#ifndef ARCHMIRROR_DIRS_H
#define ARCHMIRROR_DIRS_H

/* Creates dir and its missing parents (mode 0750). Returns 0, or an errno value
 * (ENAMETOOLONG, ENOTDIR when something else is in the way, EACCES, EROFS, …). */
int am_dirs_make(const char *dir);

#endif
